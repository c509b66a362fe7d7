//! rustls for the HTTP API: the server's configuration with a certificate
//! that can be replaced while listeners stay open, optional client
//! certificates for operator endpoints, and the client side used by the CLI
//! and by agents asking each other's API.

use std::sync::{Arc, OnceLock, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::pki::Issued;
use super::TlsError;

/// ring, explicitly: no process-wide provider is installed or assumed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(what: &str) -> impl FnOnce(rustls::Error) -> TlsError + '_ {
    move |e| TlsError::Other(format!("{what}: {e}"))
}

/// Certificates of a PEM text.
pub fn certs_from_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Other(format!("{what}: malformed PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Other(format!("{what}: no certificate in it")));
    }
    Ok(certs)
}

fn roots_from_pem(pem: &str, what: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(pem, what)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Other(format!("{what}: not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = certs_from_pem(cert_pem, "certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|_| TlsError::Other("the private key is not PEM".into()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(tls_err("loading the private key"))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// The API's current certificate; `replace` swaps it for every new
/// handshake, connections already open keep theirs.
#[derive(Debug)]
pub struct CertSwap {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertSwap {
    pub fn new(issued: &Issued) -> Result<CertSwap, TlsError> {
        Ok(CertSwap {
            current: RwLock::new(certified_key(&issued.cert_pem, issued.key_pem.expose())?),
        })
    }

    pub fn replace(&self, issued: &Issued) -> Result<(), TlsError> {
        let fresh = certified_key(&issued.cert_pem, issued.key_pem.expose())?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }
}

impl ResolvesServerCert for CertSwap {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// Everything the API server needs for HTTPS.
#[derive(Clone)]
pub struct ApiTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// Operator endpoints need a client certificate signed by the CA.
    pub operator_needs_client_cert: bool,
}

impl ApiTls {
    pub fn new(swap: Arc<CertSwap>, ca_pem: &str, client_auth: bool) -> Result<ApiTls, TlsError> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls_err("TLS versions"))?;
        // Client certificates are asked for, never required at the TLS
        // level: health checks (load balancers) connect without one, and
        // only operator requests are refused without it.
        let builder = if client_auth {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots_from_pem(ca_pem, "CA certificate")?),
                provider(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Other(format!("client certificate verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_cert_resolver(swap);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ApiTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            operator_needs_client_cert: client_auth,
        })
    }
}

/// How the CLI and the agent's own API calls verify https:// URLs.
static CLIENT: OnceLock<Arc<ClientConfig>> = OnceLock::new();

/// Trusts `ca_pem` for https:// API URLs from now on, presenting the
/// client certificate `identity` (cert PEM, key PEM) when given. The first
/// call wins.
pub fn trust_for_api_clients(ca_pem: &str, identity: Option<(&str, &str)>) -> Result<(), TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("TLS versions"))?
        .with_root_certificates(roots_from_pem(ca_pem, "CA certificate")?);
    let config = match identity {
        Some((cert_pem, key_pem)) => {
            let chain = certs_from_pem(cert_pem, "client certificate")?;
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .map_err(|_| TlsError::Other("the client key is not PEM".into()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(tls_err("client certificate"))?
        }
        None => builder.with_no_client_auth(),
    };
    let _ = CLIENT.set(Arc::new(config));
    Ok(())
}

/// The client configuration for https:// URLs: the trusted CA, or no
/// trusted root at all (every https:// request then fails verification).
pub fn client_config() -> Arc<ClientConfig> {
    CLIENT.get().cloned().unwrap_or_else(|| {
        Arc::new(
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default versions")
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth(),
        )
    })
}

/// Whether a CA was configured for API clients.
pub fn client_trust_configured() -> bool {
    CLIENT.get().is_some()
}

/// Accepts any server certificate while still checking the handshake
/// signatures: libpq's `sslmode=require` (encrypted, not authenticated),
/// used only when the cluster has no shared CA.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS for the agent's own SQL connections to a peer (the checkpoint before
/// pg_rewind): verified against the shared CA, else encrypted only, as the
/// libpq tools of the same node (`PgTls::libpq_params`).
pub fn postgres_client(
    tls: &super::PgTls,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("TLS versions"))?;
    let config = if tls.verify_full {
        let path = tls.file(super::CA_CERT);
        let pem = std::fs::read_to_string(&path)
            .map_err(|e| TlsError::Other(format!("reading {}: {e}", path.display())))?;
        builder
            .with_root_certificates(roots_from_pem(&pem, &path.display().to_string())?)
            .with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider())))
            .with_no_client_auth()
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::tls::pki::{create_ca, CertInfo, Issuer, SubjectName};

    /// One handshake through `acceptor`; the certificate the server showed.
    async fn served(acceptor: &tokio_rustls::TlsAcceptor, client: Arc<ClientConfig>) -> CertInfo {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = {
            let acceptor = acceptor.clone();
            tokio::spawn(async move { acceptor.accept(server_io).await.map(|_| ()) })
        };
        let name = rustls_pki_types::ServerName::try_from("n1.internal").unwrap();
        let stream = tokio_rustls::TlsConnector::from(client)
            .connect(name, client_io)
            .await
            .unwrap();
        server.await.unwrap().unwrap();
        let der = &stream.get_ref().1.peer_certificates().unwrap()[0];
        CertInfo::from_der(der).unwrap()
    }

    #[tokio::test]
    async fn a_replaced_certificate_serves_new_handshakes_through_the_same_acceptor() {
        let now = SystemTime::now();
        let ca = create_ca("test CA", now, Duration::from_secs(86_400)).unwrap();
        let issuer = Issuer::from_pem(&ca.cert_pem, ca.key_pem.expose(), now).unwrap();
        let names = [SubjectName::parse("n1.internal")];
        let first = issuer
            .issue("n1", &names, true, now, Duration::from_secs(120))
            .unwrap();
        let swap = Arc::new(CertSwap::new(&first).unwrap());
        let api = ApiTls::new(swap.clone(), &ca.cert_pem, false).unwrap();
        let client = Arc::new(
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots_from_pem(&ca.cert_pem, "ca").unwrap())
                .with_no_client_auth(),
        );
        let before = served(&api.acceptor, client.clone()).await;
        assert_eq!(
            before.public_key_der,
            CertInfo::from_pem(&first.cert_pem).unwrap().public_key_der
        );
        let second = issuer
            .issue("n1", &names, true, now, Duration::from_secs(120))
            .unwrap();
        swap.replace(&second).unwrap();
        let after = served(&api.acceptor, client).await;
        assert_eq!(
            after.public_key_der,
            CertInfo::from_pem(&second.cert_pem).unwrap().public_key_der
        );
    }
}
