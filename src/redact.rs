//! URLs with their credentials hidden before they are shown: a string helper that the store
//! (the database's URL) and the upstream client (every provider's base URL) share.

/// `url` with the password of its `user:password@` shown as `***`, and a user name with no
/// password (which may be a token: `https://sk-…@host`) too, for logs, errors and `Debug`: the
/// database's URL and every upstream's. The scheme and host stay readable. It errs towards
/// hiding: the last `@` is taken as the end of the userinfo, as in a URL that does not parse.
pub fn redact_url(url: &str) -> String {
    let (shown, rest, past_query) = match userinfo(url) {
        Some((start, at)) => {
            let shown = match url[start..at].split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => "***".to_string(),
            };
            // A `?` then a `=`: a query's parameter (a `?` alone may be a password's).
            let past_query = (url[start..at].split_once('?')).is_some_and(|(_, q)| q.contains('='));
            (format!("{}{shown}", &url[..start]), &url[at..], past_query)
        }
        None => (String::new(), url, false),
    };
    // The query, after the userinfo (a `?` inside a password is hidden with it). When what was
    // hidden as the userinfo ran into the query (an `@` in a parameter's value: `?user=a@b`),
    // the rest is still the query's: that value's end hidden too (it may be a password's),
    // and the parameters after it as any query's.
    match rest.split_once('?') {
        Some((before, query)) => format!("{shown}{before}?{}", redact_query(query)),
        None if past_query => match rest.split_once('&') {
            Some((_, after)) => format!("{shown}@***&{}", redact_query(after)),
            None => format!("{shown}@***"),
        },
        None => format!("{shown}{rest}"),
    }
}

/// Where a URL's userinfo starts and its `@` is, if it has one: the last `@`, as in a URL that
/// does not parse. Without a scheme (a URL mistyped: `user:password@host/db`), an `@` after a
/// `:` (a text's `name@example.com` has no password to hide).
fn userinfo(url: &str) -> Option<(usize, usize)> {
    let at = url.rfind('@')?;
    // A scheme before the `@` (one after it is another URL's, in a query or a text).
    match url[..at].find("://") {
        Some(scheme) => (at >= scheme + 3).then_some((scheme + 3, at)),
        None => url[..at].contains(':').then_some((0, at)),
    }
}

/// A URL's query with the values of parameters that may hold a secret shown as `***`: sqlx
/// takes a Postgres password as `?password=`, and some providers' keys ride in the query
/// (`?key=`, `?api-key=`, `?token=`, an Azure SAS `?sig=`). By name, erring towards hiding.
fn redact_query(query: &str) -> String {
    const SECRET: [&str; 7] = ["pass", "pwd", "key", "token", "secret", "auth", "sig"];
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if SECRET.iter().any(|s| name.to_ascii_lowercase().contains(s)) => {
                format!("{name}=***")
            }
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
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
            // Secrets in the query: sqlx's `password`, a provider's key.
            (
                "postgres://u@h/db?sslmode=require&password=secret",
                "postgres://***@h/db?sslmode=require&password=***",
            ),
            (
                "https://h/v1?api-version=1&API_KEY=secret&sslpassword=secret",
                "https://h/v1?api-version=1&API_KEY=***&sslpassword=***",
            ),
            (
                "postgres://u:secret@h/db?options=-c%20statement_timeout%3D5s",
                "postgres://u:***@h/db?options=-c%20statement_timeout%3D5s",
            ),
            ("postgres://u:se?cret@h/db", "postgres://u:***@h/db"),
            // An `@` in the query: what follows it is still the query's, its secrets hidden.
            // Before, the password after it was shown.
            (
                "postgres://h/db?user=admin@srv&password=secret",
                "postgres://***@***&password=***",
            ),
            ("postgres://h/db?password=se@cret", "postgres://***@***"),
            ("postgres://u:pw@h/db?password=p@ss", "postgres://u:***@***"),
            // No scheme (a URL mistyped): a password before an `@` is hidden all the same;
            // an address with none is a text's, and stays as it is.
            ("admin:secret@db:5432/app", "admin:***@db:5432/app"),
            ("postgres:/u:pw@h/db", "postgres:***@h/db"),
            ("u:pw@h?next=https://x", "u:***@h?next=https://x"),
            ("support@example.com", "support@example.com"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
