"""Where polyak meets training loops it does not own.

- :mod:`polyak.integrations.hook`: :func:`polyak.attach`, an optimizer post-step hook that calls
  ``ema.update()`` once per real optimizer step (torch only);
- :mod:`polyak.integrations.lightning`: ``EMACallback`` for Lightning (needs ``lightning``);
- :mod:`polyak.integrations.transformers`: the Hugging Face ``Trainer`` callback (needs
  ``transformers``).

Nothing is imported here: each module is imported by the code that uses it, so ``import polyak``
never imports Lightning or transformers.
"""
