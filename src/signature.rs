//! Standard Webhooks signing: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed
//! with the base64-decoded part of a `whsec_` secret. During a secret rotation's grace
//! period a message is signed with both secrets, space-separated, as the specification
//! allows, so a receiver holding either one accepts it.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A decoded webhook secret, or during a rotation the current and the previous one. Its
/// `Debug` never shows a key.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<Vec<u8>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Secret {
    /// Parses `whsec_` + base64 of 24..64 bytes. The error never repeats the secret.
    pub fn parse(text: &str) -> Result<Secret, String> {
        let encoded = text
            .strip_prefix("whsec_")
            .ok_or("the secret does not start with `whsec_`")?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| "the secret after `whsec_` is not valid base64")?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!(
                "the secret decodes to {} bytes, expected 24 to 64",
                key.len()
            ));
        }
        Ok(Secret(vec![key]))
    }

    /// This secret, also signing with `previous` (a rotated-out secret still in its grace
    /// period): its signature comes after this one's.
    pub fn with_previous(mut self, previous: Secret) -> Secret {
        self.0.extend(previous.0);
        self
    }

    /// The `webhook-signature` header value for this message: one `v1,<signature>` per
    /// key, space-separated.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let signatures: Vec<String> = self
            .0
            .iter()
            .map(|key| sign_with(key, msg_id, timestamp, body))
            .collect();
        signatures.join(" ")
    }
}

fn sign_with(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_webhooks_reference_vector() {
        // From the Standard Webhooks specification's test suite.
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = secret.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn signs_with_the_previous_secret_too() {
        let current = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let previous = Secret::parse("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").unwrap();
        let both = current.clone().with_previous(previous.clone());
        let body = br#"{"test": 2432232314}"#;
        let sig = both.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        let expected = format!(
            "{} {}",
            current.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            previous.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
        );
        assert_eq!(sig, expected);
        assert!(sig.starts_with("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE= v1,"));
    }

    #[test]
    fn rejects_malformed_secrets_without_echoing_them() {
        for bad in [
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_!!!notbase64",
            "whsec_c2hvcnQ=",
        ] {
            let err = Secret::parse(bad).unwrap_err();
            assert!(!err.contains(bad), "{err}");
        }
        assert!(
            format!(
                "{:?}",
                Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()
            )
            .contains("***")
        );
    }
}
