"""The model: loading the tokenizer and base, the device policy, packed attention and compiling."""
