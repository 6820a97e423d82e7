//! TLS for both connections: rustls with the ring provider, the broker verified against
//! the configured CA (not the system's roots: a device trusts its fleet's CA only),
//! and optionally a client certificate that identifies the device to the broker.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::UplinkError;

/// The files of a TLS connection.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    /// Certificate chain and private key (PEM), for brokers that require them.
    pub client: Option<(PathBuf, PathBuf)>,
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, UplinkError> {
    let bad = |e: String| UplinkError::Tls(format!("{what} {}: {e}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// Reads and checks the files once, at start: a wrong path is an error then, not a
/// connection that fails forever.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, UplinkError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(&files.ca, "CA file")? {
        roots.add(cert).map_err(|e| UplinkError::Tls(format!("CA file {}: {e}", files.ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UplinkError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match &files.client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certs(cert, "client certificate")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| UplinkError::Tls(format!("client key {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| UplinkError::Tls(format!("client certificate and key: {e}")))?
        }
    };
    Ok(Arc::new(config))
}
