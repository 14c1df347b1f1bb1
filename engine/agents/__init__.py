"""Agents: LLM backends, budget and rate limits, prompts and their templates."""
