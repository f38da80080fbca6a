//! Scope coverage. Scopes are `:`-separated segments; `S` covers `O` when the segments of `S`
//! are a prefix of the segments of `O` (`mail` covers `mail:read`, never `mailbox`).

/// Whether scope `scope` covers operation or scope `operation`.
pub fn covers(scope: &str, operation: &str) -> bool {
    let mut wanted = operation.split(':');
    scope
        .split(':')
        .all(|segment| wanted.next() == Some(segment))
}

/// Whether some member of `set` covers `operation`.
pub fn covered_by_any(set: &[String], operation: &str) -> bool {
    set.iter().any(|scope| covers(scope, operation))
}

/// Whether every member of `inner` is covered by some member of `outer`.
pub fn within(inner: &[String], outer: &[String]) -> bool {
    inner.iter().all(|scope| covered_by_any(outer, scope))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(scopes: &[&str]) -> Vec<String> {
        scopes.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn design_examples() {
        assert!(covers("mail", "mail:read"));
        assert!(covers("mail", "mail:read:inbox"));
        assert!(covers("mail:read", "mail:read:inbox"));
        assert!(covers("mail:read", "mail:read"));
        assert!(!covers("mail:read", "mail:send"));
        assert!(!covers("mail:read", "mailbox:read"));
        assert!(!covers("mail", "mailbox"));
        assert!(!covers("mail:read:inbox", "mail:read"));
        assert!(within(
            &set(&["mail:read:inbox", "cal"]),
            &set(&["mail:read", "cal"])
        ));
        assert!(!within(&set(&["mail"]), &set(&["mail:read"])));
        assert!(within(&[], &set(&["x"])));
    }

    fn segment() -> impl Strategy<Value = String> {
        // Short alphabets make shared prefixes (mail / mailbox) likely.
        "[ab]{1,3}"
    }

    fn scope() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(segment(), 1..5)
    }

    proptest! {
        #[test]
        fn coverage_is_reflexive(s in scope()) {
            prop_assert!(covers(&s.join(":"), &s.join(":")));
        }

        #[test]
        fn coverage_is_transitive(a in scope(), b in scope(), c in scope()) {
            let (a, b, c) = (a.join(":"), b.join(":"), c.join(":"));
            if covers(&a, &b) && covers(&b, &c) {
                prop_assert!(covers(&a, &c));
            }
        }

        #[test]
        fn coverage_is_segment_prefix(s in scope(), o in scope()) {
            let expected = s.len() <= o.len() && s.iter().zip(&o).all(|(x, y)| x == y);
            prop_assert_eq!(covers(&s.join(":"), &o.join(":")), expected);
        }

        #[test]
        fn a_longer_segment_is_never_covered(s in scope(), extra in "[ab]{1,2}") {
            // "mail" never covers "mailbox": extend the last segment without a separator.
            let mut longer = s.clone();
            if let Some(last) = longer.last_mut() {
                last.push_str(&extra);
            }
            prop_assert!(!covers(&s.join(":"), &longer.join(":")));
            let mut sub = longer.clone();
            sub.push("x".into());
            prop_assert!(!covers(&s.join(":"), &sub.join(":")));
        }
    }
}
