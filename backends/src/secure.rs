//! What the networked stores share about secrets and TLS: URLs with their passwords hidden
//! (for `Debug`, logs and error messages), and finding the TLS failure inside a driver's error.

use std::error::Error;
use std::sync::Arc;

pub(crate) use crate::redact::redact_url;

/// The rustls error somewhere in `e`'s chain (a refused certificate, a failed handshake), as
/// text, or `None` when the failure has nothing to do with TLS. Looks through `io::Error`
/// payloads and `Arc`-wrapped errors, which `source()` alone skips.
pub(crate) fn tls_cause(e: &(dyn Error + 'static)) -> Option<String> {
    let mut next: Option<&(dyn Error + 'static)> = Some(e);
    let mut depth = 0;
    while let Some(current) = next {
        depth += 1;
        if depth > 16 {
            return None;
        }
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(found) = tls_cause(inner) {
                    return Some(found);
                }
            }
        }
        if let Some(shared) = current.downcast_ref::<Arc<dyn Error + Send + Sync>>() {
            if let Some(found) = tls_cause(shared.as_ref()) {
                return Some(found);
            }
        }
        next = current.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact_url("rediss://app:s3cret@cache:6380/0"),
            "rediss://app:***@cache:6380/0"
        );
        assert_eq!(redact_url("redis://:s3cret@cache"), "redis://:***@cache");
        assert_eq!(
            redact_url("postgres://db/x?user=a&password=s3cret&sslmode=require"),
            "postgres://db/x?user=a&password=***&sslmode=require"
        );
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn tls_errors_are_found_inside_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        assert!(tls_cause(&io).is_some_and(|m| m.contains("certificate")));
        let shared: Arc<dyn Error + Send + Sync> = Arc::new(io);
        assert!(tls_cause(&shared).is_some());
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(tls_cause(&plain), None);
    }
}
