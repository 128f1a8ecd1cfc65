"""On-disk formats that users write or read by hand: each format lives in one module that
reads, validates and writes it."""
