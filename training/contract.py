"""What the training script tells those who use its model, beyond SageMaker's own contract: one line of its log
names the SHA-256 of each file it left in the model directory. The log is written by the job's platform with the
job's role, which nobody else may write with; selection trusts a model.tar.gz only when it holds these very files."""

MODEL_FILES_LINE = "Model files: "  # followed by a JSON object: relative path → SHA-256 (hex)
