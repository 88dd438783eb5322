"""What the person at the terminal sees: progress, library noise kept to the log, the closing summary, signals."""
