//! The check that keeps the groups of [`conformance_suite!`](crate::conformance_suite)
//! and the suite's functions in step. It runs in the compiler: a suite
//! function that no group lists (so no backend would run it), one listed in
//! two groups, or a listed name that is no suite function is a build error of
//! this crate, naming the function.
//!
//! `build.rs` lists the suite's functions from its source files (every
//! `pub async fn` that starts a line in `src/suite.rs` or under
//! `src/suite/`); the groups come from the macro itself ([`crate::GROUPS`]).

/// A suite function found by the build script, with the build errors that
/// name it.
pub(crate) struct SuiteFunction {
    pub(crate) name: &'static str,
    pub(crate) in_no_group: &'static str,
    pub(crate) in_two_groups: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/suite_functions.rs"));

/// A disagreement between the suite's functions and the groups.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Drift {
    /// A function that no group lists (the message naming it).
    InNoGroup(&'static str),
    /// A function that two groups list (the message naming it).
    InTwoGroups(&'static str),
    /// A listed name that is no suite function.
    NotAFunction(&'static str),
}

type Groups = [(&'static str, &'static [&'static str])];

/// The first disagreement between `functions` and `groups`, if any.
pub(crate) const fn check(functions: &[SuiteFunction], groups: &Groups) -> Option<Drift> {
    let mut f = 0;
    while f < functions.len() {
        match times_listed(functions[f].name, groups) {
            0 => return Some(Drift::InNoGroup(functions[f].in_no_group)),
            1 => {}
            _ => return Some(Drift::InTwoGroups(functions[f].in_two_groups)),
        }
        f += 1;
    }
    let mut g = 0;
    while g < groups.len() {
        let mut t = 0;
        while t < groups[g].1.len() {
            let name = groups[g].1[t];
            if !is_function(name, functions) {
                return Some(Drift::NotAFunction(name));
            }
            t += 1;
        }
        g += 1;
    }
    None
}

const _: () = match check(SUITE_FUNCTIONS, crate::GROUPS) {
    None => {}
    Some(Drift::InNoGroup(message) | Drift::InTwoGroups(message)) => panic!("{}", message),
    // A group of `conformance_suite!` lists this name, but no line of
    // src/suite.rs or src/suite/ starts with `pub async fn` and this name.
    Some(Drift::NotAFunction(name)) => panic!("{}", name),
};

const fn times_listed(name: &str, groups: &Groups) -> usize {
    let mut n = 0;
    let mut g = 0;
    while g < groups.len() {
        let mut t = 0;
        while t < groups[g].1.len() {
            if same(name, groups[g].1[t]) {
                n += 1;
            }
            t += 1;
        }
        g += 1;
    }
    n
}

const fn is_function(name: &str, functions: &[SuiteFunction]) -> bool {
    let mut f = 0;
    while f < functions.len() {
        if same(name, functions[f].name) {
            return true;
        }
        f += 1;
    }
    false
}

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn function(name: &'static str) -> SuiteFunction {
        SuiteFunction {
            name,
            in_no_group: "in no group",
            in_two_groups: "in two groups",
        }
    }

    #[test]
    fn the_build_script_lists_every_suite_function_of_every_group() {
        let found: BTreeSet<&str> = SUITE_FUNCTIONS.iter().map(|f| f.name).collect();
        let listed: BTreeSet<&str> = crate::GROUPS
            .iter()
            .flat_map(|(_, tests)| tests.iter().copied())
            .collect();
        assert_eq!(found, listed);
        assert_eq!(found.len(), SUITE_FUNCTIONS.len(), "no name found twice");
        // Both signature shapes of the suite: bound inline, and a `where` clause.
        assert!(found.contains("append_round_trip"));
        assert!(found.contains("staged_migration_end_to_end"));
        let message = SUITE_FUNCTIONS
            .iter()
            .find(|f| f.name == "checkpoints")
            .map(|f| f.in_no_group);
        assert!(
            message.is_some_and(|m| m.contains("`checkpoints` (src/suite.rs:")),
            "{message:?}"
        );
    }

    #[test]
    fn agreeing_lists_pass() {
        let functions = [function("a"), function("b")];
        assert_eq!(check(&functions, &[("g", &["a"]), ("h", &["b"])]), None);
        assert_eq!(check(&[], &[]), None);
    }

    #[test]
    fn a_function_in_no_group_is_reported() {
        let functions = [
            function("a"),
            SuiteFunction {
                in_no_group: "b is in no group",
                ..function("b")
            },
        ];
        assert_eq!(
            check(&functions, &[("g", &["a"])]),
            Some(Drift::InNoGroup("b is in no group"))
        );
        // A name that only starts like a listed one is not listed.
        assert_eq!(
            check(&[function("ab")], &[("g", &["a"])]),
            Some(Drift::InNoGroup("in no group"))
        );
    }

    #[test]
    fn a_function_in_two_groups_is_reported() {
        let functions = [SuiteFunction {
            in_two_groups: "a twice",
            ..function("a")
        }];
        assert_eq!(
            check(&functions, &[("g", &["a"]), ("h", &["a"])]),
            Some(Drift::InTwoGroups("a twice"))
        );
    }

    #[test]
    fn a_listed_name_that_is_no_function_is_reported() {
        assert_eq!(
            check(&[function("a")], &[("g", &["a", "gone"])]),
            Some(Drift::NotAFunction("gone"))
        );
    }
}
