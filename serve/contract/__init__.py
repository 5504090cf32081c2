"""The request contract: which fields each route accepts, and the checks a body passes."""
