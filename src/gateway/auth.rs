//! Connection tokens: JWT verification (HS256 with a secret, RS256/ES256 with a public
//! key) and minting for development. `exp` and `sub` are required (and `aud` / `iss` when
//! `auth.audience` / `auth.issuer` are set), `alg: none` and any algorithm but the
//! configured one are refused, the clock leeway is configurable. `iat` is read for the
//! backend's revocation (a disconnect refuses tokens issued before it); the check itself
//! needs State and is made by the sequencer at hello.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;
use crate::protocol::frames::check_user;

/// Claims the broker reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    /// Issued at, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contacts: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("auth.jwt_public_key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("no token verifier is configured (auth.jwt_secret and auth.jwt_public_key are empty)")]
    NotConfigured,
}

/// Verifies connection tokens.
#[derive(Clone)]
pub struct Verifier {
    key: Option<DecodingKey>,
    validation: Validation,
}

impl Verifier {
    pub fn new(cfg: &AuthConfig) -> Result<Verifier, AuthError> {
        let (key, alg) = if !cfg.jwt_public_key.is_empty() {
            let path = &cfg.jwt_public_key;
            let pem = std::fs::read(path).map_err(|e| AuthError::Key {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                (Some(k), Algorithm::RS256)
            } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                (Some(k), Algorithm::ES256)
            } else {
                return Err(AuthError::Key {
                    path: path.clone(),
                    reason: "not an RSA or EC public key in PEM".into(),
                });
            }
        } else if !cfg.jwt_secret.is_empty() {
            (
                Some(DecodingKey::from_secret(cfg.jwt_secret.as_bytes())),
                Algorithm::HS256,
            )
        } else {
            (None, Algorithm::HS256)
        };
        let mut validation = Validation::new(alg);
        validation.leeway = cfg.leeway_s;
        // jsonwebtoken checks `aud`/`iss` only when the token has them: a configured one
        // must also be required, or a token without the claim would pass.
        let mut required = vec!["exp", "sub"];
        validation.validate_exp = true;
        // Off by default in jsonwebtoken; PROTOCOL.md promises `nbf` is honoured.
        validation.validate_nbf = true;
        if !cfg.audience.is_empty() {
            validation.set_audience(&[cfg.audience.as_str()]);
            required.push("aud");
        } else {
            validation.validate_aud = false;
        }
        if !cfg.issuer.is_empty() {
            validation.set_issuer(&[cfg.issuer.as_str()]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Verifier { key, validation })
    }

    /// Checks a token and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let key = self.key.as_ref().ok_or(AuthError::NotConfigured)?;
        let data = decode::<Claims>(token, key, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        check_user("sub", &data.claims.sub).map_err(|e| AuthError::Invalid(e.message))?;
        Ok(data.claims)
    }
}

/// Mints an HS256 token for `user` valid for `ttl_s` seconds (development convenience).
pub fn mint(secret: &str, user: &str, ttl_s: u64, now_s: u64) -> Result<String, AuthError> {
    let claims = Claims {
        sub: user.to_string(),
        exp: now_s + ttl_s,
        iat: Some(now_s),
        name: None,
        contacts: None,
    };
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| AuthError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn verifier() -> Verifier {
        let mut c = Config::embedded().auth;
        c.jwt_secret = "s3cret".into();
        c.leeway_s = 0;
        Verifier::new(&c).unwrap()
    }

    fn now() -> u64 {
        crate::sequencer::now_ms() / 1000
    }

    #[test]
    fn a_minted_token_verifies() {
        let t = mint("s3cret", "alice", 60, now()).unwrap();
        assert_eq!(verifier().verify(&t).unwrap().sub, "alice");
    }

    #[test]
    fn expired_wrong_key_and_none_are_refused() {
        let v = verifier();
        assert!(v
            .verify(&mint("s3cret", "alice", 0, now() - 10).unwrap())
            .is_err());
        assert!(v
            .verify(&mint("other", "alice", 60, now()).unwrap())
            .is_err());
        // {"alg":"none"} . {"sub":"alice","exp":9999999999} . (no signature)
        let none = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(v.verify(none).is_err());
        assert!(v.verify("not.a.jwt").is_err());
    }

    #[test]
    fn configured_audience_and_issuer_are_required_and_checked() {
        let mut c = Config::embedded().auth;
        c.jwt_secret = "s3cret".into();
        c.audience = "chat".into();
        c.issuer = "https://id.example".into();
        let v = Verifier::new(&c).unwrap();
        let sign = |claims: serde_json::Value| {
            encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(b"s3cret"),
            )
            .unwrap()
        };
        let exp = now() + 60;
        let good = serde_json::json!({"sub": "alice", "exp": exp, "aud": "chat", "iss": "https://id.example"});
        assert!(v.verify(&sign(good.clone())).is_ok());
        for (k, bad) in [("aud", "other"), ("iss", "https://evil.example")] {
            let mut claims = good.clone();
            claims[k] = serde_json::json!(bad);
            assert!(v.verify(&sign(claims)).is_err(), "wrong {k} accepted");
            let mut claims = good.clone();
            claims.as_object_mut().unwrap().remove(k);
            assert!(v.verify(&sign(claims)).is_err(), "missing {k} accepted");
        }
    }

    #[test]
    fn a_user_id_with_a_colon_is_refused() {
        let t = mint("s3cret", "a:b", 60, now()).unwrap();
        assert!(verifier().verify(&t).is_err());
    }
}
