"""The formats the stages read and write, as small pure functions where they can be: model
architectures, tokenizers, Hugging Face folders, PEFT adapters, datasets, GGUF headers, OCI
layouts and tars, Ollama Modelfiles and Compose files."""
