"""The control plane: the token lifecycle over HTTP, on its own port."""
