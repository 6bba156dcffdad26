//! URLs with their credentials hidden before they are shown: a string helper that the store
//! (the database's URL) and the upstream client (every provider's base URL) share.

/// `url` with the password of its `user:password@` shown as `***`, and a user name with no
/// password (which may be a token: `https://sk-…@host`) too, for logs, errors and `Debug`: the
/// database's URL and every upstream's. The scheme and host stay readable. It errs towards
/// hiding: the last `@` is taken as the end of the userinfo, as in a URL that does not parse.
pub fn redact_url(url: &str) -> String {
    let (Some(start), Some(at)) = (url.find("://").map(|i| i + 3), url.rfind('@')) else {
        return url.to_string();
    };
    if at < start {
        return url.to_string();
    }
    let shown = match url[start..at].split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{}{shown}{}", &url[..start], &url[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    // A password is hidden, and so is a user name that has no password (often a token, as in
    // `https://sk-…@host`); the scheme, host, port and path stay readable.
    #[test]
    fn urls_are_shown_without_credentials_but_with_scheme_and_host() {
        for (url, shown) in [
            (
                "postgres://u:secret@h:5432/db",
                "postgres://u:***@h:5432/db",
            ),
            ("https://sk-secret@host/v1", "https://***@host/v1"),
            ("postgres://u@h/db", "postgres://***@h/db"),
            ("http://user:p@ss@h/v1", "http://user:***@h/v1"),
            ("http://h:8000/v1", "http://h:8000/v1"),
            ("sqlite://fusion.db", "sqlite://fusion.db"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
