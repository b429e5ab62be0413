//! The bus against a real redis-server.
