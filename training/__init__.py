"""Shared training code for AgriCLIP: data loading, prompt generation, the ALive builder and the stage scripts."""
