//! Authentication besides the API key: HTTP Basic, or OAuth2 bearer tokens
//! from a token endpoint (Keycloak) with the client-credentials or password
//! grant. Tokens are cached until shortly before they expire and fetched
//! anew once when the dispatcher answers 401.

use crate::config::{ConfigError, Dispatcher, Secret, read_secret};
use base64::Engine;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Refresh this long before the token's stated expiry.
const EARLY: Duration = Duration::from_secs(30);

pub enum Auth {
    None,
    Basic(Secret),
    OAuth(OAuth),
}

pub struct OAuth {
    token_url: String,
    client_id: String,
    client_secret: Secret,
    password_grant: Option<(String, Secret)>,
    cached: Mutex<Option<(Secret, Instant)>>,
}

#[derive(Debug, thiserror::Error)]
#[error("token endpoint: {0}")]
pub struct TokenError(pub String);

impl Auth {
    pub fn from_config(d: &Dispatcher) -> Result<Auth, ConfigError> {
        let a = &d.auth;
        if let (Some(user), Some(file)) = (&a.basic_user, &a.basic_password_file) {
            let password = read_secret(file, "the HTTP Basic password")?;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", password.expose()));
            return Ok(Auth::Basic(Secret::new(format!("Basic {token}"))));
        }
        if let (Some(url), Some(id), Some(secret_file)) = (&a.token_url, &a.client_id, &a.client_secret_file) {
            let password_grant = match (&a.username, &a.password_file) {
                (Some(u), Some(f)) => Some((u.clone(), read_secret(f, "the OAuth2 password")?)),
                _ => None,
            };
            return Ok(Auth::OAuth(OAuth {
                token_url: url.0.clone(),
                client_id: id.clone(),
                client_secret: read_secret(secret_file, "the OAuth2 client secret")?,
                password_grant,
                cached: Mutex::new(None),
            }));
        }
        Ok(Auth::None)
    }

    /// Values that must never be echoed in a message.
    pub fn secrets(&self) -> Vec<String> {
        match self {
            Auth::None => Vec::new(),
            Auth::Basic(s) => vec![s.expose().to_string()],
            Auth::OAuth(o) => {
                let mut v = vec![o.client_secret.expose().to_string()];
                if let Some((_, p)) = &o.password_grant {
                    v.push(p.expose().to_string());
                }
                v
            }
        }
    }

    /// The Authorization header value for the next request, if any.
    pub fn header(&self, agent: &ureq::Agent) -> Result<Option<String>, TokenError> {
        match self {
            Auth::None => Ok(None),
            Auth::Basic(s) => Ok(Some(s.expose().to_string())),
            Auth::OAuth(o) => o.token(agent).map(|t| Some(format!("Bearer {t}"))),
        }
    }

    /// Forgets a cached token (the dispatcher refused it). True if there was
    /// one to forget, i.e. a retry with a fresh token may help.
    pub fn invalidate(&self) -> bool {
        match self {
            Auth::OAuth(o) => crate::lock(&o.cached).take().is_some(),
            _ => false,
        }
    }
}

impl OAuth {
    fn token(&self, agent: &ureq::Agent) -> Result<String, TokenError> {
        let mut cached = crate::lock(&self.cached);
        if let Some((t, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok(t.expose().to_string());
        }
        let mut form = vec![
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.expose()),
        ];
        match &self.password_grant {
            Some((user, password)) => {
                form.push(("grant_type", "password"));
                form.push(("username", user));
                form.push(("password", password.expose()));
            }
            None => form.push(("grant_type", "client_credentials")),
        }
        let body: String = form
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let mut resp = agent
            .post(&self.token_url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("Accept", "application/json")
            .send(body.as_bytes())
            .map_err(|e| {
                TokenError(format!(
                    "unreachable ({})",
                    crate::net::explain_tls(&e).unwrap_or_else(|| e.to_string())
                ))
            })?;
        let status = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(1024 * 1024)
            .read_to_vec()
            .map_err(|_| TokenError("unreadable answer".into()))?;
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if status != 200 {
            // OAuth2 errors carry a code and a description, never our secret.
            let code = json.get("error").and_then(|v| v.as_str()).unwrap_or("no error code");
            return Err(TokenError(format!(
                "HTTP {status} ({})",
                code.chars().take(60).collect::<String>()
            )));
        }
        let token = json
            .get("access_token")
            .and_then(|v| v.as_str())
            .ok_or_else(|| TokenError("answer without access_token".into()))?
            .to_string();
        let lifetime = json.get("expires_in").and_then(|v| v.as_u64()).unwrap_or(60);
        let until = Instant::now() + Duration::from_secs(lifetime).saturating_sub(EARLY);
        *cached = Some((Secret::new(token.clone()), until));
        Ok(token)
    }
}

/// application/x-www-form-urlencoded value encoding.
fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn form_values_are_encoded() {
        assert_eq!(super::urlencode("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
    }
}
