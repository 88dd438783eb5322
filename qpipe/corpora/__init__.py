"""The texts qpipe reads: built-in evaluation texts and token streams, calibration sets."""
