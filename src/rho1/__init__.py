"""rho1: Selective Language Modeling (Rho-1, NeurIPS 2024) on Hugging Face models."""

__version__ = "0.1.0"
__all__ = ["selective_loss", "select_from_token_loss", "Selection", "SCORES", "register_score", "RULES",
           "register_rule", "__version__"]


def __getattr__(name: str):
    # torch is imported on first use, so `import rho1.cli` (and `rho1 --help`) stays light
    if name in __all__:
        from rho1 import selection

        return getattr(selection, name)
    raise AttributeError(f"module 'rho1' has no attribute {name!r}")
