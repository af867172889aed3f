"""Tables and figures built from run folders and Optuna studies on disk (`python -m analysis.compare`)."""
