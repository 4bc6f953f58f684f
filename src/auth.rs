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

/// The longest a token is cached, whatever the endpoint says.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

pub enum Auth {
    None,
    Basic {
        /// `Basic base64(user:password)`, the header value.
        header: Secret,
        /// `user:password` and the password alone, for redaction.
        pair: Secret,
        password: Secret,
    },
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
    pub(crate) fn from_config(d: &Dispatcher) -> Result<Auth, ConfigError> {
        let a = &d.auth;
        if let (Some(user), Some(file)) = (&a.basic_user, &a.basic_password_file) {
            let password = read_secret(file, "the HTTP Basic password")?;
            let pair = format!("{user}:{}", password.expose());
            let token = base64::engine::general_purpose::STANDARD.encode(&pair);
            return Ok(Auth::Basic {
                header: Secret::new(format!("Basic {token}")),
                pair: Secret::new(pair),
                password,
            });
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

    /// Values that must never be echoed in a message (a `Redactor` also
    /// removes their base64 and URL-encoded forms).
    pub fn secrets(&self) -> Vec<String> {
        match self {
            Auth::None => Vec::new(),
            Auth::Basic { header, pair, password } => {
                vec![
                    header.expose().to_string(),
                    pair.expose().to_string(),
                    password.expose().to_string(),
                ]
            }
            Auth::OAuth(o) => o.secrets(),
        }
    }

    /// The Authorization header value for the next request, if any.
    pub fn header(&self, agent: &ureq::Agent) -> Result<Option<String>, TokenError> {
        match self {
            Auth::None => Ok(None),
            Auth::Basic { header, .. } => Ok(Some(header.expose().to_string())),
            Auth::OAuth(o) => o.token(agent).map(|t| Some(format!("Bearer {t}"))),
        }
    }

    /// Forgets a cached token (the dispatcher refused it). True if there was
    /// one to forget, i.e. a retry with a fresh token may help.
    pub(crate) fn invalidate(&self) -> bool {
        match self {
            Auth::OAuth(o) => crate::lock(&o.cached).take().is_some(),
            _ => false,
        }
    }
}

impl OAuth {
    /// The client secret and the password-grant password.
    fn own_secrets(&self) -> Vec<String> {
        let mut v = vec![self.client_secret.expose().to_string()];
        if let Some((_, p)) = &self.password_grant {
            v.push(p.expose().to_string());
        }
        v
    }

    fn secrets(&self) -> Vec<String> {
        let mut v = self.own_secrets();
        if let Some((t, _)) = crate::lock(&self.cached).as_ref() {
            v.push(t.expose().to_string());
        }
        v
    }

    fn token(&self, agent: &ureq::Agent) -> Result<String, TokenError> {
        let mut cached = crate::lock(&self.cached);
        if let Some((t, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok(t.expose().to_string());
        }
        // (Only on a fetch: every request asks for the cached token.)
        let redactor = crate::privacy::Redactor::with_credentials(&self.own_secrets());
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
                let reason = crate::net::explain_tls(&e).unwrap_or_else(|| e.to_string());
                TokenError(format!("unreachable ({})", redactor.clean(&reason, 200)))
            })?;
        let status = resp.status().as_u16();
        if (300..400).contains(&status) {
            let location = resp.headers().get("location").and_then(|v| v.to_str().ok());
            return Err(TokenError(format!(
                "HTTP {status}, a redirect to {}; redirects are not followed (they would carry the client \
                 secret elsewhere): check [dispatcher.auth] token_url",
                crate::net::location_host(location)
            )));
        }
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(1024 * 1024)
            .read_to_vec()
            .map_err(|_| TokenError("unreadable answer".into()))?;
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if status != 200 {
            // An OAuth2 error carries a code: a hostile or careless
            // endpoint may echo our secret in it, or a newline.
            let code = json.get("error").and_then(|v| v.as_str()).unwrap_or("no error code");
            return Err(TokenError(format!("HTTP {status} ({})", redactor.clean(code, 60))));
        }
        let token = json
            .get("access_token")
            .and_then(|v| v.as_str())
            .ok_or_else(|| TokenError("answer without access_token".into()))?
            .to_string();
        // A lifetime beyond a day is taken as a day: a token is fetched
        // anew at least daily, and an absurd `expires_in` (2^64-1) cannot
        // overflow the clock.
        let lifetime = json
            .get("expires_in")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(60)
            .min(MAX_LIFETIME.as_secs());
        let now = Instant::now();
        let until = now
            .checked_add(Duration::from_secs(lifetime).saturating_sub(EARLY))
            .unwrap_or(now);
        *cached = Some((Secret::new(token.clone()), until));
        Ok(token)
    }
}

/// application/x-www-form-urlencoded value encoding.
fn urlencode(s: &str) -> String {
    crate::privacy::percent_encode(s).replace("%20", "+")
}

#[cfg(test)]
mod tests {
    #[test]
    fn form_values_are_encoded() {
        assert_eq!(super::urlencode("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
    }
}
