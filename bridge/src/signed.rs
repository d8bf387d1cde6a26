//! Signed messages from the cloud (`bridge.signatures`). A container `run` is root on the node,
//! and an MQTT delivery does not say who published it: any client the cloud broker lets write
//! under the node's prefix could command it. With signatures required, every message the bridge
//! receives must be an envelope signed with Ed25519 by a key the node trusts:
//!
//! ```json
//! {"msg": "<the command or patch, as a JSON string>", "exp": 1767225600000,
//!  "key": "ops-2026", "sig": "<base64 of the 64-byte signature>"}
//! ```
//!
//! The signature covers `edgetwin-sig-v1\n{topic}\n{exp}\n{msg}` (UTF-8), where `topic` is the
//! full cloud topic (with the node's prefix): a signed command is good for one node and one
//! topic only. `exp` (unix ms) must be in the future and at most `max_validity_s` ahead, which
//! bounds how long a captured envelope can be replayed (container commands are idempotent by
//! `id`, desired patches by last-writer-wins `ts`). Pure: no I/O, the clock is passed in.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

/// What the signature covers begins with this, so a signature made for anything else never
/// verifies here.
pub const CONTEXT: &str = "edgetwin-sig-v1";

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not a signed envelope at all.
    #[error("not a signed envelope ({0}); this node requires signed cloud messages")]
    Unsigned(String),
    /// Signed with a key the node does not trust.
    #[error("signed with key {0:?}, which this node does not trust")]
    UnknownKey(String),
    /// The signature does not match the message, topic and expiry.
    #[error("the signature does not match (wrong key, topic, expiry or message)")]
    BadSignature,
    /// `exp` has passed.
    #[error("expired {0} ms ago")]
    Expired(i64),
    /// `exp` is further ahead than the node accepts.
    #[error("valid for {0} s, more than the {1} s this node accepts")]
    TooLong(i64, u64),
}

impl Refusal {
    /// The label of `edgetwin_bridge_refused_messages_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Unsigned(_) => "unsigned",
            Refusal::UnknownKey(_) => "unknown_key",
            Refusal::BadSignature => "bad_signature",
            Refusal::Expired(_) => "expired",
            Refusal::TooLong(..) => "too_long",
        }
    }

    /// Every reason, for pre-registering the metric's labels.
    pub const REASONS: [&'static str; 5] = [
        "unsigned",
        "unknown_key",
        "bad_signature",
        "expired",
        "too_long",
    ];
}

/// The envelope on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// The message itself.
    pub msg: String,
    /// Valid until (unix ms).
    pub exp: i64,
    /// Which trusted key signed it.
    pub key: String,
    /// Base64 (standard, padded) of the Ed25519 signature.
    pub sig: String,
}

fn signed_bytes(topic: &str, exp: i64, msg: &str) -> Vec<u8> {
    format!("{CONTEXT}\n{topic}\n{exp}\n{msg}").into_bytes()
}

/// The keys a node trusts, and how long an envelope may be valid.
#[derive(Debug, Clone)]
pub struct Verifier {
    keys: BTreeMap<String, Vec<u8>>,
    max_validity_ms: i64,
}

impl Verifier {
    /// From key ids and base64 Ed25519 public keys (32 bytes each); `Err` names the bad key.
    pub fn new(keys: &BTreeMap<String, String>, max_validity_s: u64) -> Result<Verifier, String> {
        let mut decoded = BTreeMap::new();
        for (id, b64) in keys {
            let bytes = STANDARD
                .decode(b64.trim())
                .map_err(|e| format!("key {id:?}: not base64: {e}"))?;
            if bytes.len() != 32 {
                return Err(format!(
                    "key {id:?}: an Ed25519 public key is 32 bytes, this one is {}",
                    bytes.len()
                ));
            }
            decoded.insert(id.clone(), bytes);
        }
        if decoded.is_empty() {
            return Err("no keys: a node requiring signatures must trust at least one".into());
        }
        Ok(Verifier {
            keys: decoded,
            max_validity_ms: i64::try_from(max_validity_s.saturating_mul(1000)).unwrap_or(i64::MAX),
        })
    }

    /// The message inside a valid envelope received on `topic` (the full cloud topic).
    pub fn open(&self, topic: &str, payload: &[u8], now_ms: i64) -> Result<Vec<u8>, Refusal> {
        let env: Envelope =
            serde_json::from_slice(payload).map_err(|e| Refusal::Unsigned(e.to_string()))?;
        let key = self
            .keys
            .get(&env.key)
            .ok_or_else(|| Refusal::UnknownKey(env.key.clone()))?;
        let sig = STANDARD
            .decode(env.sig.trim())
            .map_err(|_| Refusal::BadSignature)?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&signed_bytes(topic, env.exp, &env.msg), &sig)
            .map_err(|_| Refusal::BadSignature)?;
        // Checked after the signature, so an unsigned sender learns nothing about the clock.
        if env.exp <= now_ms {
            return Err(Refusal::Expired(now_ms - env.exp));
        }
        if env.exp - now_ms > self.max_validity_ms {
            return Err(Refusal::TooLong(
                (env.exp - now_ms) / 1000,
                u64::try_from(self.max_validity_ms / 1000).unwrap_or(0),
            ));
        }
        Ok(env.msg.into_bytes())
    }
}

/// An Ed25519 signing key.
pub struct Signer {
    pair: Ed25519KeyPair,
}

/// The DER of an Ed25519 PKCS#8 v1 private key (RFC 8410) up to its 32-byte seed.
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A new private key as PEM (`PRIVATE KEY`, PKCS#8 v1 as RFC 8410 shows it), which OpenSSL,
/// Python's `cryptography` and Go read as they are. ring makes PKCS#8 v2 (with the public key),
/// which not every library reads; the seed is the same.
pub fn generate() -> Result<String, String> {
    let rng = ring::rand::SystemRandom::new();
    let v2 =
        Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| format!("cannot generate a key: {e}"))?;
    // ring's v2 document has the v1 layout up to the seed, which follows at the same offset.
    let seed = v2
        .as_ref()
        .get(PKCS8_V1_PREFIX.len()..PKCS8_V1_PREFIX.len() + 32)
        .ok_or("unexpected key document from ring")?;
    let mut der = PKCS8_V1_PREFIX.to_vec();
    der.extend_from_slice(seed);
    let b64 = STANDARD.encode(&der);
    Ok(format!(
        "-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n"
    ))
}

impl Signer {
    /// From a PKCS#8 private key, PEM or DER.
    pub fn from_pkcs8(key: &[u8]) -> Result<Signer, String> {
        let der = match std::str::from_utf8(key) {
            Ok(text) if text.trim_start().starts_with("-----BEGIN") => {
                let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
                STANDARD
                    .decode(body.trim())
                    .map_err(|e| format!("not a PEM private key: {e}"))?
            }
            _ => key.to_vec(),
        };
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map(|pair| Signer { pair })
            .map_err(|e| format!("not an Ed25519 PKCS#8 private key: {e}"))
    }

    /// The public key, base64: what `bridge.signatures.keys` takes.
    pub fn public_key(&self) -> String {
        STANDARD.encode(self.pair.public_key().as_ref())
    }

    /// The envelope of `msg` for `topic` (the full cloud topic), valid until `exp` (unix ms).
    pub fn seal(&self, key_id: &str, topic: &str, exp: i64, msg: &str) -> Envelope {
        let sig = self.pair.sign(&signed_bytes(topic, exp, msg));
        Envelope {
            msg: msg.to_string(),
            exp,
            key: key_id.to_string(),
            sig: STANDARD.encode(sig.as_ref()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TOPIC: &str = "edgetwin/plant-7/node/containers/cmd";
    const NOW: i64 = 1_767_225_600_000;

    fn signer() -> Signer {
        Signer::from_pkcs8(generate().unwrap().as_bytes()).unwrap()
    }

    fn verifier(s: &Signer) -> Verifier {
        let keys = BTreeMap::from([("ops".to_string(), s.public_key())]);
        Verifier::new(&keys, 3600).unwrap()
    }

    fn bytes(e: &Envelope) -> Vec<u8> {
        serde_json::to_vec(e).unwrap()
    }

    #[test]
    fn signed_envelope_opens_to_its_message() {
        let s = signer();
        let e = s.seal(
            "ops",
            TOPIC,
            NOW + 60_000,
            r#"{"id":"c-1","action":"list"}"#,
        );
        assert_eq!(
            verifier(&s).open(TOPIC, &bytes(&e), NOW).unwrap(),
            br#"{"id":"c-1","action":"list"}"#.to_vec()
        );
    }

    #[test]
    fn signed_envelope_is_refused_for_every_way_it_can_be_wrong() {
        let s = signer();
        let v = verifier(&s);
        let good = s.seal("ops", TOPIC, NOW + 60_000, "{}");
        let reason =
            |payload: &[u8], topic: &str| v.open(topic, payload, NOW).unwrap_err().reason();
        assert_eq!(reason(b"{\"id\":\"c-1\"}", TOPIC), "unsigned");
        assert_eq!(reason(b"not json", TOPIC), "unsigned");
        let mut other_key = good.clone();
        other_key.key = "someone".into();
        assert_eq!(reason(&bytes(&other_key), TOPIC), "unknown_key");
        let mut tampered = good.clone();
        tampered.msg = r#"{"action":"run"}"#.into();
        assert_eq!(reason(&bytes(&tampered), TOPIC), "bad_signature");
        let mut later = good.clone();
        later.exp += 1;
        assert_eq!(
            reason(&bytes(&later), TOPIC),
            "bad_signature",
            "exp is signed"
        );
        assert_eq!(
            reason(&bytes(&good), "edgetwin/plant-8/node/containers/cmd"),
            "bad_signature",
            "another node's topic"
        );
        let stranger = signer().seal("ops", TOPIC, NOW + 60_000, "{}");
        assert_eq!(reason(&bytes(&stranger), TOPIC), "bad_signature");
        let old = s.seal("ops", TOPIC, NOW - 1, "{}");
        assert_eq!(reason(&bytes(&old), TOPIC), "expired");
        let long = s.seal("ops", TOPIC, NOW + 7_200_000, "{}");
        assert_eq!(reason(&bytes(&long), TOPIC), "too_long");
    }

    #[test]
    fn signed_keys_are_checked_when_configured() {
        let bad = |k: &str| {
            Verifier::new(&BTreeMap::from([("k".to_string(), k.to_string())]), 60).unwrap_err()
        };
        assert!(bad("***").contains("not base64"));
        assert!(bad("AAAA").contains("32 bytes"));
        assert!(Verifier::new(&BTreeMap::new(), 60)
            .unwrap_err()
            .contains("no keys"));
    }
}
