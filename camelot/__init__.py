"""camelot: a consolidated associative memory beside any frozen HF causal LM (CAMELoT)."""

from camelot.config import CamelotConfig
from camelot.models import load_model
from camelot.wrapper import CamelotModel, ScoreOutput, wrap

__version__ = "0.1.0"
__all__ = ["CamelotConfig", "CamelotModel", "ScoreOutput", "load_model", "wrap", "__version__"]
