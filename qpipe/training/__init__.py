"""Fine-tuning a loaded model: real optimizer steps with their memory measured by phase
(``steps``), and the plan files a user launches their own training with (``launch``)."""
