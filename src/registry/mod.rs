//! (in progress) registry client.

/// The caller's own `Authorization` header value (Basic), passed through upstream; never logged.
#[derive(Clone, Default)]
pub struct Credentials(pub Option<String>);

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Credentials(<redacted>)" } else { "Credentials(none)" })
    }
}
