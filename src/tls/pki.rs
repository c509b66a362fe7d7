//! Certificates as data: creating a cluster CA, checking a CA handed to the
//! node (parses, is a CA, not expired, key matches), issuing server and
//! client certificates signed by it, and describing any certificate for
//! `pgha certs show`. No files and no clock reads here: callers pass `now`.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::secret::Secret;

/// Why a certificate or key is unusable. The message never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PkiError(pub String);

fn err(message: impl Into<String>) -> PkiError {
    PkiError(message.into())
}

/// A CA whose key this node holds: it can sign certificates.
pub struct Issuer {
    /// The CA certificate as given (PEM), written as `ca.crt` for Postgres.
    pub cert_pem: String,
    pub not_after: SystemTime,
    /// The CA re-created from its parameters for rcgen's `signed_by`; same
    /// subject and key identifier as `cert_pem`, so issued certificates chain to it.
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A freshly created certificate and its private key, both PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: Secret,
    pub not_after: SystemTime,
}

fn offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn system_time(t: OffsetDateTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(t.unix_timestamp()).unwrap_or(0))
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "pgha");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Creates a self-signed CA (ECDSA P-256) valid from a minute before `now`
/// for `validity`.
pub fn create_ca(
    common_name: &str,
    now: SystemTime,
    validity: Duration,
) -> Result<Issued, PkiError> {
    let key = KeyPair::generate().map_err(|e| err(format!("generating a CA key: {e}")))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = offset(now - Duration::from_secs(60));
    params.not_after = offset(now + validity);
    let not_after = system_time(params.not_after);
    let cert = params
        .self_signed(&key)
        .map_err(|e| err(format!("signing the CA: {e}")))?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: Secret::new(key.serialize_pem()),
        not_after,
    })
}

impl Issuer {
    /// Checks a CA certificate and key: both parse, the certificate is a CA
    /// (basicConstraints CA:TRUE) within its validity at `now`, and the key
    /// is the certificate's. Messages say what is wrong, not with what text.
    pub fn from_pem(cert_pem: &str, key_pem: &str, now: SystemTime) -> Result<Issuer, CaProblem> {
        let info = CertInfo::from_pem(cert_pem).map_err(CaProblem::Cert)?;
        if !info.is_ca {
            return Err(CaProblem::Cert(err(format!(
                "not a CA certificate: {} lacks the basicConstraints CA flag",
                info.subject
            ))));
        }
        if info.not_after <= now {
            return Err(CaProblem::Cert(err(format!(
                "the CA certificate {} expired at {}",
                info.subject,
                humantime::format_rfc3339_seconds(info.not_after)
            ))));
        }
        if info.not_before > now {
            return Err(CaProblem::Cert(err(format!(
                "the CA certificate {} is not valid before {}",
                info.subject,
                humantime::format_rfc3339_seconds(info.not_before)
            ))));
        }
        let key = KeyPair::from_pem(key_pem).map_err(|_| {
            CaProblem::Key(err(
                "not a PEM private key (expected PKCS#8 \"-----BEGIN PRIVATE KEY-----\")",
            ))
        })?;
        if key.public_key_der() != info.public_key_der {
            return Err(CaProblem::Key(err(format!(
                "the key does not match the CA certificate {}",
                info.subject
            ))));
        }
        let params = CertificateParams::from_ca_cert_pem(cert_pem)
            .map_err(|e| CaProblem::Cert(err(format!("unusable CA certificate: {e}"))))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaProblem::Key(err(format!("cannot sign with this key: {e}"))))?;
        Ok(Issuer {
            cert_pem: cert_pem.trim_end().to_owned() + "\n",
            not_after: info.not_after,
            cert,
            key,
        })
    }

    /// Issues a certificate for `common_name` with `names` (host names and IP
    /// addresses) as SANs. `server` adds serverAuth; every certificate has
    /// clientAuth, so a node can present its own certificate as a client.
    pub fn issue(
        &self,
        common_name: &str,
        names: &[SubjectName],
        server: bool,
        now: SystemTime,
        validity: Duration,
    ) -> Result<Issued, PkiError> {
        let key = KeyPair::generate().map_err(|e| err(format!("generating a key: {e}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        params.subject_alt_names = names
            .iter()
            .map(|n| match n {
                SubjectName::Ip(ip) => Ok(SanType::IpAddress(*ip)),
                SubjectName::Dns(name) => name
                    .as_str()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|_| err(format!("{name:?} is not a valid DNS name"))),
            })
            .collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = if server {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.use_authority_key_identifier_extension = true;
        // Never outlive the CA: a chain with an expired CA fails anyway.
        let not_after = (now + validity).min(self.not_after);
        params.not_before = offset(now - Duration::from_secs(60));
        params.not_after = offset(not_after);
        let not_after = system_time(params.not_after);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(|e| err(format!("signing a certificate for {common_name}: {e}")))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: Secret::new(key.serialize_pem()),
            not_after,
        })
    }
}

/// What is wrong with a CA: its certificate or its key (the caller names the
/// file or variable each came from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaProblem {
    Cert(PkiError),
    Key(PkiError),
}

/// A SAN of a node certificate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum SubjectName {
    Dns(String),
    Ip(IpAddr),
}

impl SubjectName {
    /// An IP address if `text` is one (brackets allowed), else a DNS name.
    pub fn parse(text: &str) -> SubjectName {
        let bare = text.trim().trim_start_matches('[').trim_end_matches(']');
        match bare.parse::<IpAddr>() {
            Ok(ip) => SubjectName::Ip(ip),
            Err(_) => SubjectName::Dns(bare.to_ascii_lowercase()),
        }
    }
}

impl std::fmt::Display for SubjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubjectName::Dns(n) => write!(f, "DNS:{n}"),
            SubjectName::Ip(ip) => write!(f, "IP:{ip}"),
        }
    }
}

/// The facts of one certificate that operators and the agent look at.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    pub sans: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    /// SubjectPublicKeyInfo, DER.
    pub public_key_der: Vec<u8>,
}

impl CertInfo {
    /// The first certificate of a PEM text.
    pub fn from_pem(pem: &str) -> Result<CertInfo, PkiError> {
        Ok(CertInfo::all_from_pem(pem)?.remove(0))
    }

    /// Every certificate of a PEM text (at least one).
    pub fn all_from_pem(pem: &str) -> Result<Vec<CertInfo>, PkiError> {
        let mut out = Vec::new();
        for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
            let block = block.map_err(|e| err(format!("malformed PEM: {e}")))?;
            if block.label != "CERTIFICATE" {
                continue;
            }
            let cert = block
                .parse_x509()
                .map_err(|e| err(format!("malformed certificate: {e}")))?;
            out.push(CertInfo::of(&cert));
        }
        if out.is_empty() {
            return Err(err(
                "no certificate found (expected PEM \"-----BEGIN CERTIFICATE-----\")",
            ));
        }
        Ok(out)
    }

    /// One DER certificate (as a TLS peer presents it).
    pub fn from_der(der: &[u8]) -> Result<CertInfo, PkiError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| err(format!("malformed certificate: {e}")))?;
        Ok(CertInfo::of(&cert))
    }

    fn of(cert: &x509_parser::certificate::X509Certificate<'_>) -> CertInfo {
        use x509_parser::extensions::GeneralName;
        let at = |t: &x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
            } else {
                UNIX_EPOCH
            }
        };
        let sans = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .map(|name| match name {
                        GeneralName::DNSName(d) => format!("DNS:{d}"),
                        GeneralName::IPAddress(bytes) => match bytes.len() {
                            4 => format!(
                                "IP:{}",
                                IpAddr::from(<[u8; 4]>::try_from(*bytes).expect("4 bytes"))
                            ),
                            16 => format!(
                                "IP:{}",
                                IpAddr::from(<[u8; 16]>::try_from(*bytes).expect("16 bytes"))
                            ),
                            _ => "IP:?".to_owned(),
                        },
                        other => format!("{other}"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        CertInfo {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            sans,
            not_before: at(&cert.validity().not_before),
            not_after: at(&cert.validity().not_after),
            is_ca: cert.is_ca(),
            public_key_der: cert.public_key().raw.to_vec(),
        }
    }

    /// Seconds from `now` until expiry (negative once expired).
    pub fn seconds_left(&self, now: SystemTime) -> i64 {
        seconds_until(self.not_after, now)
    }

    /// Several lines for `pgha certs show`.
    pub fn render(&self, label: &str, now: SystemTime) -> String {
        let left = self.seconds_left(now);
        const DAY: i64 = 86_400;
        let remaining = match left {
            l if l >= 2 * DAY => format!("in {} days", l / DAY),
            l if l > 0 => format!(
                "in {}",
                humantime::format_duration(Duration::from_secs(l.unsigned_abs()))
            ),
            _ => "EXPIRED".to_owned(),
        };
        format!(
            "{label}\n  subject:   {}\n  issuer:    {}\n  SANs:      {}\n  CA:        {}\n  not after: {} ({remaining})\n",
            self.subject,
            self.issuer,
            if self.sans.is_empty() {
                "-".to_owned()
            } else {
                self.sans.join(", ")
            },
            if self.is_ca { "yes" } else { "no" },
            humantime::format_rfc3339_seconds(self.not_after),
        )
    }
}

/// Whole seconds from `now` until `t`, negative when `t` has passed.
pub fn seconds_until(t: SystemTime, now: SystemTime) -> i64 {
    match t.duration_since(now) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Renewal is due once less than a third of the validity remains.
pub fn renewal_due(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> bool {
    let total = not_after.duration_since(not_before).unwrap_or_default();
    match not_after.duration_since(now) {
        Ok(left) => left < total / 3,
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn a_created_ca_signs_node_certificates_with_every_name() {
        let ca = create_ca("test CA", now(), 3650 * DAY).unwrap();
        let issuer = Issuer::from_pem(&ca.cert_pem, ca.key_pem.expose(), now()).unwrap();
        let names = [
            SubjectName::parse("n1"),
            SubjectName::parse("n1.internal"),
            SubjectName::parse("127.0.0.1"),
            SubjectName::parse("[fdaa::2]"),
        ];
        let cert = issuer.issue("n1", &names, true, now(), 90 * DAY).unwrap();
        let info = CertInfo::from_pem(&cert.cert_pem).unwrap();
        assert!(!info.is_ca);
        assert!(info.subject.contains("CN=n1"));
        assert!(info.issuer.contains("CN=test CA"));
        assert_eq!(
            info.sans,
            ["DNS:n1", "DNS:n1.internal", "IP:127.0.0.1", "IP:fdaa::2"]
        );
        assert_eq!(info.seconds_left(now()), (90 * DAY).as_secs() as i64);
        let key = KeyPair::from_pem(cert.key_pem.expose()).unwrap();
        assert_eq!(key.public_key_der(), info.public_key_der);
    }

    #[test]
    fn certificates_never_outlive_their_ca() {
        let ca = create_ca("short CA", now(), DAY).unwrap();
        let issuer = Issuer::from_pem(&ca.cert_pem, ca.key_pem.expose(), now()).unwrap();
        let cert = issuer.issue("n1", &[], true, now(), 90 * DAY).unwrap();
        assert_eq!(cert.not_after, ca.not_after);
    }

    #[test]
    fn bad_cas_are_refused_with_the_reason() {
        let ca = create_ca("test CA", now(), 10 * DAY).unwrap();
        let other = create_ca("other CA", now(), 10 * DAY).unwrap();
        let issuer = Issuer::from_pem(&ca.cert_pem, ca.key_pem.expose(), now()).unwrap();
        let leaf = issuer.issue("n1", &[], true, now(), DAY).unwrap();

        let mismatch = Issuer::from_pem(&ca.cert_pem, other.key_pem.expose(), now()).unwrap_err();
        assert!(matches!(&mismatch, CaProblem::Key(e) if e.0.contains("does not match")));

        let expired =
            Issuer::from_pem(&ca.cert_pem, ca.key_pem.expose(), now() + 11 * DAY).unwrap_err();
        assert!(matches!(&expired, CaProblem::Cert(e) if e.0.contains("expired")));

        let not_ca = Issuer::from_pem(&leaf.cert_pem, leaf.key_pem.expose(), now()).unwrap_err();
        assert!(matches!(&not_ca, CaProblem::Cert(e) if e.0.contains("CA flag")));

        let garbage = Issuer::from_pem("hello", ca.key_pem.expose(), now()).unwrap_err();
        assert!(matches!(&garbage, CaProblem::Cert(e) if e.0.contains("no certificate")));

        let bad_key = Issuer::from_pem(
            &ca.cert_pem,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            now(),
        )
        .unwrap_err();
        assert!(matches!(&bad_key, CaProblem::Key(_)));
        // No message carries key material.
        let key_body = other.key_pem.expose().lines().nth(1).unwrap();
        for problem in [mismatch, bad_key] {
            let CaProblem::Key(e) = problem else { panic!() };
            assert!(!e.0.contains(key_body) && !e.0.contains("AAAA"), "{}", e.0);
        }
    }

    #[test]
    fn renewal_is_due_in_the_last_third() {
        let start = now();
        let end = start + Duration::from_secs(90);
        assert!(!renewal_due(start, end, start + Duration::from_secs(59)));
        assert!(renewal_due(start, end, start + Duration::from_secs(61)));
        assert!(renewal_due(start, end, end + Duration::from_secs(1)));
    }
}
