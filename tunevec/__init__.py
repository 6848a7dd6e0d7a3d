"""tunevec: tuning vectors (tau = theta_tuned - theta_base) extracted, analysed and steered through vLLM."""

__version__ = "0.1.0"
