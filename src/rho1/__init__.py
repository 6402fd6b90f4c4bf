"""rho1: Selective Language Modeling (Rho-1, NeurIPS 2024) on Hugging Face models."""

from rho1.selection import SCORE_FUNCTIONS, Selection, select_from_token_loss, selective_loss

__version__ = "0.1.0"
__all__ = ["selective_loss", "select_from_token_loss", "Selection", "SCORE_FUNCTIONS", "__version__"]
