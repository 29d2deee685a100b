"""Current exo (the 2025+ rewrite, HTTP API on port 52415): its JSON (`schema`), a bounded
HTTP and server-sent-events client (`http`), and `exo-bridge place` (`place`)."""
