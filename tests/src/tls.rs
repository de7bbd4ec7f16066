//! A test mesh CA issuing SPIFFE workload certificates, as Istio's CA does.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A workload's certificate, key and the mesh's trust anchor, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The SPIFFE id in the certificate's URI SAN.
    pub spiffe_id: String,
    /// Leaf certificate.
    pub cert_pem: String,
    /// Private key.
    pub key_pem: String,
    /// The CA certificate peers are validated against.
    pub ca_pem: String,
}

/// A mesh certificate authority.
pub struct MeshCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl MeshCa {
    /// A new self-signed CA.
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::OrganizationName, "cluster.local");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("a CA key");
        MeshCa { issuer: CertifiedIssuer::self_signed(params, key).expect("a CA certificate") }
    }

    /// Issue a workload certificate for `spiffe://cluster.local/ns/<namespace>/sa/<sa>`.
    pub fn issue(&self, namespace: &str, service_account: &str) -> Identity {
        let spiffe_id = format!("spiffe://cluster.local/ns/{namespace}/sa/{service_account}");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params.subject_alt_names = vec![SanType::URI(spiffe_id.clone().try_into().expect("an IA5 URI"))];
        params.distinguished_name.push(DnType::OrganizationName, "cluster.local");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("a leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("a leaf certificate");
        Identity { spiffe_id, cert_pem: cert.pem(), key_pem: key.serialize_pem(), ca_pem: self.issuer.pem() }
    }
}

impl Default for MeshCa {
    fn default() -> Self {
        Self::new()
    }
}
