"""Relay trainer: fine-tunes BERT-family models in preemptible legs. Importing it must not import torch."""
