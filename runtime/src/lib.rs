//! Cairn: a portable on-device LLM inference runtime.
