//! Enums the derive accepts. Each type name is checked against the tag serde
//! actually writes, then encoded and decoded through `annals`.

use annals::{
    decode_event, encode_event, DomainEvent, EventId, GlobalPosition, Metadata, Payload,
    RecordedEvent, StreamId, StreamVersion,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The tag serde writes for `event`: the key of `{"tag": ..}`, or the string
/// of a unit variant.
fn serde_tag<E: Serialize>(event: &E) -> String {
    match serde_json::to_value(event).expect("serializes") {
        Value::String(tag) => tag,
        Value::Object(map) if map.len() == 1 => map.keys().next().expect("one key").clone(),
        other => panic!("not externally tagged: {other}"),
    }
}

/// Checks that `events` (one of each variant, in order) have the type names
/// `names`, that these are serde's tags and the whole of `EVENT_TYPES`, and
/// that each event survives the store's encoding.
fn check<E: DomainEvent + PartialEq + std::fmt::Debug>(events: &[E], names: &[&str]) {
    let tags: Vec<String> = events.iter().map(serde_tag).collect();
    let types: Vec<&str> = events.iter().map(DomainEvent::event_type).collect();
    assert_eq!(types, names, "event_type()");
    assert_eq!(tags, names, "serde's tags");
    assert_eq!(E::EVENT_TYPES, names, "EVENT_TYPES");
    for event in events {
        let (event_type, version, data) = encode_event(event).expect("encodes");
        assert_eq!(E::current_version(event_type), Some(version));
        let stored = RecordedEvent {
            event_id: EventId::new(),
            stream_id: StreamId::parse("Test-1").expect("valid stream"),
            stream_version: StreamVersion(1),
            global_position: GlobalPosition::from_seq(1),
            event_type: event_type.to_owned(),
            event_version: version,
            data: Payload::from_value(&data).expect("JSON"),
            metadata: Metadata::default(),
            recorded_at: chrono::Utc::now(),
            stored_event_version: None,
            stored_event_type: None,
        };
        assert_eq!(&decode_event::<E>(&stored).expect("decodes"), event);
    }
}

/// One enum per serde rule, with names that exercise word boundaries: a
/// single letter, two words, a digit, an acronym and a raw identifier.
macro_rules! rule_case {
    ($test:ident, $rule:tt, [$($name:literal),*]) => {
        #[test]
        fn $test() {
            #[derive(PartialEq, Debug, Serialize, Deserialize, DomainEvent)]
            #[serde(rename_all = $rule)]
            #[allow(non_camel_case_types)]
            enum E {
                A,
                AccountOpened { owner: String },
                Z42(u8),
                HTTPRequest(u8, u8),
                r#type,
            }
            check(
                &[
                    E::A,
                    E::AccountOpened { owner: "ann".into() },
                    E::Z42(4),
                    E::HTTPRequest(1, 2),
                    E::r#type,
                ],
                &[$($name),*],
            );
        }
    };
}

rule_case!(
    lowercase,
    "lowercase",
    ["a", "accountopened", "z42", "httprequest", "type"]
);
rule_case!(
    uppercase,
    "UPPERCASE",
    ["A", "ACCOUNTOPENED", "Z42", "HTTPREQUEST", "TYPE"]
);
rule_case!(
    pascal_case,
    "PascalCase",
    ["A", "AccountOpened", "Z42", "HTTPRequest", "type"]
);
rule_case!(
    camel_case,
    "camelCase",
    ["a", "accountOpened", "z42", "hTTPRequest", "type"]
);
rule_case!(
    snake_case,
    "snake_case",
    ["a", "account_opened", "z42", "h_t_t_p_request", "type"]
);
rule_case!(
    screaming_snake_case,
    "SCREAMING_SNAKE_CASE",
    ["A", "ACCOUNT_OPENED", "Z42", "H_T_T_P_REQUEST", "TYPE"]
);
rule_case!(
    kebab_case,
    "kebab-case",
    ["a", "account-opened", "z42", "h-t-t-p-request", "type"]
);
rule_case!(
    screaming_kebab_case,
    "SCREAMING-KEBAB-CASE",
    ["A", "ACCOUNT-OPENED", "Z42", "H-T-T-P-REQUEST", "TYPE"]
);

#[test]
fn no_rename_uses_the_variant_names() {
    #[derive(PartialEq, Debug, Serialize, Deserialize, DomainEvent)]
    enum E {
        Opened { owner: String },
        Closed,
    }
    check(
        &[E::Opened { owner: "a".into() }, E::Closed],
        &["Opened", "Closed"],
    );
}

#[test]
fn variant_rename_wins_over_rename_all() {
    #[derive(PartialEq, Debug, Serialize, Deserialize, DomainEvent)]
    #[serde(rename_all = "kebab-case")]
    enum E {
        MoneyIn(i64),
        #[serde(rename = "Money.Out")]
        MoneyOut(i64),
        // Equal serialize and deserialize names are one name.
        #[serde(rename(serialize = "frozen!", deserialize = "frozen!"))]
        Frozen,
    }
    check(
        &[E::MoneyIn(1), E::MoneyOut(2), E::Frozen],
        &["money-in", "Money.Out", "frozen!"],
    );
}

#[test]
fn rename_all_with_the_same_rule_both_ways() {
    #[derive(PartialEq, Debug, Serialize, Deserialize, DomainEvent)]
    #[serde(rename_all(serialize = "snake_case", deserialize = "snake_case"))]
    enum E {
        AccountOpened,
    }
    check(&[E::AccountOpened], &["account_opened"]);
}

#[test]
fn a_one_sided_rename_that_agrees_with_the_other_side() {
    // `serialize` renamed to what `rename_all` gives the deserialize side.
    #[derive(PartialEq, Debug, Serialize, Deserialize, DomainEvent)]
    #[serde(rename_all = "snake_case")]
    enum E {
        #[serde(rename(serialize = "account_opened"))]
        AccountOpened,
    }
    check(&[E::AccountOpened], &["account_opened"]);
}

#[test]
fn aliases_are_read_and_listed_after_the_names() {
    #[derive(PartialEq, Debug, Serialize, Deserialize, DomainEvent)]
    enum E {
        #[serde(alias = "Created", alias = "Begun")]
        Opened { owner: String },
        #[event(version = 2)]
        #[serde(rename(serialize = "Shut", deserialize = "Shut", deserialize = "Closed"))]
        Shut,
    }
    assert_eq!(
        E::EVENT_TYPES,
        ["Opened", "Shut", "Created", "Begun", "Closed"]
    );
    assert_eq!(E::current_version("Begun"), Some(1));
    assert_eq!(E::current_version("Closed"), Some(2));
    assert_eq!(E::current_version("Shut"), Some(2));
    assert_eq!(E::Shut.event_version(), 2);
    // An event stored under an old name decodes as its variant.
    let stored = RecordedEvent {
        event_id: EventId::new(),
        stream_id: StreamId::parse("Test-1").expect("valid stream"),
        stream_version: StreamVersion(1),
        global_position: GlobalPosition::from_seq(1),
        event_type: "Created".to_owned(),
        event_version: 1,
        data: Payload::from_json(r#"{"owner":"ann"}"#.to_owned()).expect("JSON"),
        metadata: Metadata::default(),
        recorded_at: chrono::Utc::now(),
        stored_event_version: None,
        stored_event_type: None,
    };
    assert_eq!(
        decode_event::<E>(&stored).expect("decodes"),
        E::Opened {
            owner: "ann".into()
        }
    );
}

#[test]
fn versions_per_variant() {
    #[derive(PartialEq, Debug, Serialize, Deserialize, DomainEvent)]
    enum E {
        V1,
        #[event(version = 2)]
        V2(u8),
        #[event(version = 4_000_000_000)]
        Big {
            n: u8,
        },
    }
    assert_eq!(E::V1.event_version(), 1);
    assert_eq!(E::V2(0).event_version(), 2);
    assert_eq!(E::Big { n: 0 }.event_version(), 4_000_000_000);
    assert_eq!(E::current_version("V2"), Some(2));
    assert_eq!(E::current_version("v2"), None);
    let (_, version, _) = encode_event(&E::V2(7)).expect("encodes");
    assert_eq!(version, 2);
    check(&[E::V1, E::V2(1), E::Big { n: 1 }], &["V1", "V2", "Big"]);
}

#[test]
fn serde_attributes_about_the_payload_are_left_to_serde() {
    #[derive(PartialEq, Debug, Serialize, Deserialize, DomainEvent)]
    #[serde(deny_unknown_fields, rename_all_fields = "camelCase")]
    enum E {
        #[serde(rename_all = "UPPERCASE")]
        Opened {
            #[serde(default)]
            owner_name: String,
        },
        Moved {
            from_place: String,
            #[serde(skip_serializing_if = "Option::is_none", default)]
            to_place: Option<String>,
        },
        #[serde(bound(serialize = "", deserialize = ""))]
        Plain(u8),
    }
    check(
        &[
            E::Opened {
                owner_name: "a".into(),
            },
            E::Moved {
                from_place: "x".into(),
                to_place: None,
            },
            E::Plain(1),
        ],
        &["Opened", "Moved", "Plain"],
    );
}

mod renamed_dependency {
    pub use annals as inner;
}

#[test]
fn crate_path_can_be_given() {
    #[derive(PartialEq, Debug, Serialize, Deserialize, DomainEvent)]
    #[event(crate = "renamed_dependency::inner")]
    enum E {
        Happened,
    }
    check(&[E::Happened], &["Happened"]);
}

#[test]
fn generic_and_empty_enums() {
    #[derive(PartialEq, Debug, Serialize, Deserialize, DomainEvent)]
    enum Wrapped<T> {
        Value(T),
        Nothing,
    }
    check(
        &[Wrapped::Value(3u8), Wrapped::Nothing],
        &["Value", "Nothing"],
    );

    #[derive(Serialize, Deserialize, DomainEvent)]
    enum Never {}
    assert!(Never::EVENT_TYPES.is_empty());
    assert_eq!(Never::current_version("Anything"), None);
}

#[test]
fn personal_data_is_declared_per_variant_and_alias() {
    #[derive(Serialize, Deserialize, DomainEvent)]
    #[allow(dead_code)]
    enum E {
        #[event(version = 2, personal(subject = "owner_id", fields("name", "mail")))]
        #[serde(alias = "Created")]
        Opened {
            owner_id: String,
            name: String,
            #[serde(rename = "mail")]
            email: String,
        },
        Closed {
            owner_id: String,
        },
    }
    let pd = annals::PersonalData {
        subject: "owner_id",
        fields: &["name", "mail"],
    };
    assert_eq!(E::personal_data("Opened"), Some(pd));
    assert_eq!(E::personal_data("Created"), Some(pd));
    assert_eq!(E::personal_data("Closed"), None);
    assert_eq!(E::current_version("Opened"), Some(2));
}
