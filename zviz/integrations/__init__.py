"""Adapters for agent frameworks (docs/integrations.md). Each submodule imports
its framework, an optional extra: `zviz.integrations.pydantic_ai`
(`zviz[pydantic-ai]`), `zviz.integrations.smolagents` (`zviz[smolagents]`),
`zviz.integrations.deepagents` (`zviz[deepagents]`). Importing this package
imports none of them."""
