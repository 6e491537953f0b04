"""Registration stage: the evaluated checkpoint becomes an MLflow registered model version with an alias."""
