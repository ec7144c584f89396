"""Django's PostgreSQL backend with a pool health check that costs no round trip on a busy connection
(``base.idle_check``). The settings' database engine; ``agentflow_project.embedded_db`` builds on it."""
