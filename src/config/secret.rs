//! `database.url`, whose password never prints: it is held in a [`SecretString`] (wiped on drop,
//! `Debug` masked), [`DatabaseUrl::expose`] is the only way out, and every serialized form — the
//! printed configuration, the defaults the layers start from — carries the masked URL.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

/// A Postgres URL whose password never prints: `Debug` and `Serialize` mask it,
/// [`DatabaseUrl::masked`] is for messages, [`DatabaseUrl::expose`] only for connecting.
#[derive(Clone, Deserialize)]
#[serde(from = "String")]
pub struct DatabaseUrl(SecretString);

impl DatabaseUrl {
    /// The URL itself, to connect with; never log it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// The URL with any password replaced by `****`.
    pub fn masked(&self) -> String {
        mask_password(self.expose())
    }
}

impl From<String> for DatabaseUrl {
    fn from(url: String) -> Self {
        DatabaseUrl(url.into())
    }
}

impl Default for DatabaseUrl {
    fn default() -> Self {
        DatabaseUrl::from("postgres://meterflow@127.0.0.1:5432/meterflow".to_owned())
    }
}

impl PartialEq for DatabaseUrl {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for DatabaseUrl {}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.masked())
    }
}

/// Writes the masked URL: nothing serialized carries the password (a URL without one is unchanged).
impl Serialize for DatabaseUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.masked())
    }
}

/// Whether `url` carries a password (in the user info or a `password=` parameter).
pub(super) fn has_password(url: &str) -> bool {
    mask_password(url) != url
}

/// `postgres://user:secret@host/db?password=x` → `postgres://user:****@host/db?password=****`.
pub fn mask_password(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let mut out = match head.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:****@{host}"),
                    None => authority.to_owned(),
                },
                None => authority.to_owned(),
            };
            format!("{scheme}://{authority}{path}")
        }
        None => head.to_owned(),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=****"),
                _ => p.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}
