"""Evaluation metrics (retrieval, classification), each with the chance level a reader needs for scale."""
