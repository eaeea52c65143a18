//! OpenPGP detached signatures of ACIs (rPGP, pure Rust). rkt verifies with the Go
//! `x/crypto/openpgp` it vendors (every release, 1.30 the last), which takes v4 keys whose primary
//! key is RSA or DSA only: it parses ECDSA but refuses it as a primary key when the key is trusted
//! ("primary key cannot be used for signatures"). So keys are v4 RSA, and others are refused when
//! the key is loaded. The signature is computed from the bytes
//! as they stream ([`Signer::sign_stream`]) and kept in [`Signatures`].

mod store;

use std::io::{self, Write};
use std::sync::mpsc::Receiver;

use bytes::Bytes;
use pgp::composed::{
    ArmorOptions, Deserializable, DetachedSignature, KeyType, SecretKeyParamsBuilder,
    SignedPublicKey, SignedSecretKey,
};
use pgp::crypto::hash::HashAlgorithm;
use pgp::packet::{SignatureConfig, SignatureType, Subpacket, SubpacketData};
use pgp::types::{KeyDetails, KeyVersion, Password, PublicParams, Timestamp};

pub use store::{InFlight, Signatures};

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("OpenPGP: {0}")]
    Pgp(String),
    #[error("the key must be an OpenPGP v4 key (rkt verifies no other)")]
    NotV4,
    #[error(
        "the key is {0}; rkt trusts RSA (and DSA) primary keys only, so strata signs with RSA \
         (`strata keygen`)"
    )]
    Algorithm(String),
    #[error(
        "the key cannot sign without a passphrase; strata takes unprotected keys (`strata keygen`)"
    )]
    Protected,
}

fn pgp_error(e: impl std::fmt::Display) -> SignError {
    // Display, not Debug: rPGP's Debug form carries a backtrace.
    SignError::Pgp(e.to_string())
}

/// Key algorithms `strata keygen` makes: RSA, the one rkt trusts and rPGP signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyKind {
    /// RSA 3072 (NIST's equivalent of 128-bit security).
    Rsa3072,
    /// RSA 4096.
    Rsa4096,
}

/// A new key pair, armored.
pub struct GeneratedKey {
    pub secret: String,
    pub public: String,
    pub fingerprint: String,
}

/// Generates a v4 signing key with a self-signed user id, unprotected.
pub fn generate(kind: KeyKind, user_id: &str) -> Result<GeneratedKey, SignError> {
    let key_type = match kind {
        KeyKind::Rsa3072 => KeyType::Rsa(3072),
        KeyKind::Rsa4096 => KeyType::Rsa(4096),
    };
    let params = SecretKeyParamsBuilder::default()
        .version(KeyVersion::V4)
        .key_type(key_type)
        .can_certify(true)
        // Go's openpgp wants the signing flag on the key that issued a signature.
        .can_sign(true)
        .primary_user_id(user_id.into())
        .build()
        .map_err(pgp_error)?;
    let key = params.generate(rand::thread_rng()).map_err(pgp_error)?;
    let signer = Signer::new(key)?;
    Ok(GeneratedKey {
        secret: signer
            .key
            .to_armored_string(ArmorOptions::default())
            .map_err(pgp_error)?,
        public: signer.public.clone(),
        fingerprint: signer.fingerprint.clone(),
    })
}

/// The service's signing key.
pub struct Signer {
    key: SignedSecretKey,
    /// Transferable public key, armored, as `/aci-signing-key` serves it.
    public: String,
    /// Lower-case hex.
    fingerprint: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.fingerprint)
    }
}

impl Signer {
    /// Loads an armored secret key, checks rkt can verify what it signs, and signs once to find out
    /// now rather than after a whole image whether it can sign at all.
    pub fn from_armored(armored: &str) -> Result<Signer, SignError> {
        let (key, _headers) =
            SignedSecretKey::from_armor_single(io::Cursor::new(armored)).map_err(pgp_error)?;
        Signer::new(key)
    }

    fn new(key: SignedSecretKey) -> Result<Signer, SignError> {
        key.verify_bindings().map_err(pgp_error)?;
        let primary = &key.primary_key;
        if primary.version() != KeyVersion::V4 {
            return Err(SignError::NotV4);
        }
        match primary.public_params() {
            PublicParams::RSA(_) => {}
            _ => return Err(SignError::Algorithm(format!("{:?}", primary.algorithm()))),
        }
        let public: SignedPublicKey = key.to_public_key();
        let public = public
            .to_armored_string(ArmorOptions::default())
            .map_err(pgp_error)?;
        let fingerprint = hex::encode(primary.fingerprint().as_bytes());
        let signer = Signer {
            key,
            public,
            fingerprint,
        };
        signer
            .config()?
            .into_hasher()
            .map_err(pgp_error)?
            .sign(&signer.key.primary_key, &Password::empty())
            .map_err(|_| SignError::Protected)?;
        Ok(signer)
    }

    pub fn public_key(&self) -> &str {
        &self.public
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// What a signature of the bytes known as `etag` is kept under: per key, so a new key re-signs.
    pub fn key_id(&self, etag: &str) -> String {
        format!("{}-{etag}", self.fingerprint)
    }

    /// A binary-document v4 signature over SHA-256, with the subpackets gpg makes: issuer fingerprint
    /// and creation time hashed, issuer key id unhashed (Go's openpgp finds the key by the key id).
    fn config(&self) -> Result<SignatureConfig, SignError> {
        let primary = &self.key.primary_key;
        let mut config = SignatureConfig::v4(
            SignatureType::Binary,
            primary.algorithm(),
            HashAlgorithm::Sha256,
        );
        config.hashed_subpackets = vec![
            Subpacket::regular(SubpacketData::IssuerFingerprint(primary.fingerprint()))
                .map_err(pgp_error)?,
            Subpacket::regular(SubpacketData::SignatureCreationTime(Timestamp::now()))
                .map_err(pgp_error)?,
        ];
        config.unhashed_subpackets =
            vec![
                Subpacket::regular(SubpacketData::IssuerKeyId(primary.legacy_key_id()))
                    .map_err(pgp_error)?,
            ];
        Ok(config)
    }

    /// Signs everything received until the sender is dropped; returns the armored signature.
    pub fn sign_stream(&self, chunks: Receiver<Bytes>) -> io::Result<Vec<u8>> {
        let mut hasher = self
            .config()
            .and_then(|c| c.into_hasher().map_err(pgp_error))
            .map_err(io::Error::other)?;
        for chunk in chunks {
            hasher.write_all(&chunk)?;
        }
        let signature = hasher
            .sign(&self.key.primary_key, &Password::empty())
            .map_err(|e| io::Error::other(pgp_error(e)))?;
        DetachedSignature::new(signature)
            .to_armored_string(ArmorOptions::default())
            .map(String::into_bytes)
            .map_err(|e| io::Error::other(pgp_error(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgp::crypto::ecc_curve::ECCCurve;

    fn verify(public: &str, data: &[u8], armored_sig: &[u8]) -> bool {
        let (public, _) = SignedPublicKey::from_armor_single(io::Cursor::new(public)).unwrap();
        let (sig, _) = DetachedSignature::from_armor_single(armored_sig).unwrap();
        sig.signature.verify(&public, data).is_ok()
    }

    #[test]
    fn generate_load_sign_stream_verify() {
        let key = generate(KeyKind::Rsa3072, "test <t@localhost>").unwrap();
        assert!(key
            .secret
            .starts_with("-----BEGIN PGP PRIVATE KEY BLOCK-----"));
        let signer = Signer::from_armored(&key.secret).unwrap();
        assert_eq!(signer.fingerprint(), key.fingerprint);
        assert_eq!(signer.public_key(), key.public);

        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        let (tx, rx) = std::sync::mpsc::sync_channel(2);
        let chunks: Vec<Bytes> = data.chunks(65_536).map(Bytes::copy_from_slice).collect();
        let feeder = std::thread::spawn(move || {
            for c in chunks {
                tx.send(c).unwrap();
            }
        });
        let sig = signer.sign_stream(rx).unwrap();
        feeder.join().unwrap();
        assert!(sig.starts_with(b"-----BEGIN PGP SIGNATURE-----"));
        assert!(verify(&key.public, &data, &sig));
        let mut tampered = data.clone();
        tampered[1000] ^= 1;
        assert!(!verify(&key.public, &tampered, &sig));
    }

    /// rkt's verifier (the `x/crypto/openpgp` rkt 1.30 vendors) refuses an ECDSA primary key when
    /// it is trusted ("primary key cannot be used for signatures"): such a key signs for nobody.
    #[test]
    fn refuses_an_ecdsa_key() {
        let params = SecretKeyParamsBuilder::default()
            .version(KeyVersion::V4)
            .key_type(KeyType::ECDSA(ECCCurve::P256))
            .can_certify(true)
            .can_sign(true)
            .primary_user_id("ecdsa <e@localhost>".into())
            .build()
            .unwrap();
        let key = params.generate(rand::thread_rng()).unwrap();
        let armored = key.to_armored_string(ArmorOptions::default()).unwrap();
        match Signer::from_armored(&armored) {
            Err(e @ SignError::Algorithm(_)) => assert!(e.to_string().contains("RSA"), "{e}"),
            other => panic!("an ECDSA key was taken: {other:?}"),
        }
    }

    #[test]
    fn refuses_what_is_not_a_key() {
        assert!(Signer::from_armored("not a key").is_err());
    }
}
