"""Integrations with host codebases (LLaVA, Bunny) and HF-native models; each in its own module."""
