//! A throw-away certificate authority and certificates for TLS tests (rcgen).

/// A throw-away PKI for TLS tests, in a temp dir.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// The path of one of its files.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// ca.pem, server.pem/server.key (localhost), client.pem/client.key (CN mapper-modbus, signed
    /// by ca), rogue.pem/rogue.key (CN mapper-modbus, self-signed: untrusted).
    pub fn generate() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        };
        let dir = tempfile::tempdir().unwrap();
        let w = |n: &str, s: String| std::fs::write(dir.path().join(n), s).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "edgetwin test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        w("ca.pem", ca_cert.pem());

        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        w(
            "server.pem",
            p.signed_by(&key, &ca_cert, &ca_key).unwrap().pem(),
        );
        w("server.key", key.serialize_pem());

        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, "mapper-modbus");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        w(
            "client.pem",
            p.signed_by(&key, &ca_cert, &ca_key).unwrap().pem(),
        );
        w("client.key", key.serialize_pem());

        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, "mapper-modbus");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        w("rogue.pem", p.self_signed(&key).unwrap().pem());
        w("rogue.key", key.serialize_pem());
        Pki { dir }
    }
}
