"""vla-ft: full-parameter fine-tuning of vision-language-action policies, scored in MuJoCo."""

__version__ = "0.1.0"
