"""glm_session's Hydra configs. Installed as the package ``glm_session.conf`` (pyproject's package-dir mapping), so
that a wheel carries them; ``glm_session.config.CONFIG_DIR`` finds them either way."""
