"""Runs in and out of other tools' formats: diffusers pipeline folders (`diffusers`)."""
