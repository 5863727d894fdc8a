//! An error and its causes as one line for people: "what failed: why: why deeper". A cause
//! whose text its parent already quotes (`#[error("...: {0}")]` over `#[from]`, serde_json's
//! and io's errors carried whole) is said once, not twice.

/// `e` and its sources, joined by ": ", each text once.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let said = cause.to_string();
        if !said.is_empty() && !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        next = cause.source();
    }
    text
}

/// The first error of type `E` in `e` and its sources.
pub fn find<'a, E: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        next = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot read the store: {0}")]
        Quoting(#[source] std::io::Error),
        #[error("cannot read the store")]
        Silent(#[source] std::io::Error),
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        assert_eq!(
            describe(&Outer::Quoting(io())),
            "cannot read the store: no such file"
        );
        assert_eq!(
            describe(&Outer::Silent(io())),
            "cannot read the store: no such file"
        );
    }
}
