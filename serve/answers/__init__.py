"""The answer on its way back: the stream tap, the one error shape, the answer log."""
