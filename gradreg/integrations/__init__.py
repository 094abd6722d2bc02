"""GR inside the trainers people use: :mod:`gradreg.integrations.lightning` (PyTorch Lightning) and
:mod:`gradreg.integrations.huggingface` (the Hugging Face ``Trainer``).

Each module imports its framework when it is imported itself; ``import gradreg`` and ``import
gradreg.integrations`` import neither.
"""
