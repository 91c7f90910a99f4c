"""Callbacks for the training frameworks people use (optional extras).

- :mod:`flatness.integrations.lightning`: :class:`FlatnessCallback`, a Lightning callback
  (``pip install "flatness[lightning]"``);
- :mod:`flatness.integrations.huggingface`: :class:`FlatnessTrainerCallback`, a Hugging Face
  ``Trainer`` callback, and :func:`lm_loss`, token-weighted language-model losses
  (``pip install "flatness[hf]"``).

Both callbacks record through a :class:`flatness.Monitor` on the main process only and log its
rows through the framework's own loggers. Importing :mod:`flatness` never imports Lightning or
transformers; each submodule imports its framework when it is imported.
"""
