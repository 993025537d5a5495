//! The bank `Account` of the standard workload: the example domain of the
//! demo, the benchmarks and the docs.

use serde::{Deserialize, Serialize};

use crate::{Aggregate, DomainEvent};

/// Events of an account. The stored type names (`Opened`, `Deposited`,
/// `Withdrew`) are the variant names, derived by `DomainEvent` from the same
/// attributes serde reads.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, DomainEvent)]
pub enum AccountEvent {
    /// The account was opened (always version 1).
    Opened {
        /// The owner.
        owner: String,
    },
    /// Money came in (minor units).
    Deposited {
        /// Amount in minor units.
        amount: i64,
    },
    /// Money went out (minor units).
    Withdrew {
        /// Amount in minor units.
        amount: i64,
    },
}

/// Why an account command was refused.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum AccountError {
    /// `open` on an account that exists.
    #[error("account is already open")]
    AlreadyOpen,
    /// A command on an account that was never opened.
    #[error("account is not open")]
    NotOpen,
    /// A zero or negative amount.
    #[error("amount must be positive, got {0}")]
    InvalidAmount(i64),
    /// A withdrawal larger than the balance.
    #[error("insufficient funds: balance {balance}, requested {requested}")]
    InsufficientFunds {
        /// Current balance.
        balance: i64,
        /// Requested amount.
        requested: i64,
    },
}

/// The account state: `{ owner, balance }`.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Account {
    /// Owner; empty until opened.
    pub owner: String,
    /// Balance in minor units.
    pub balance: i64,
    /// Whether `Opened` was applied.
    pub open: bool,
}

impl Aggregate for Account {
    const TYPE: &'static str = "Account";
    type Event = AccountEvent;

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { owner } => {
                self.owner.clone_from(owner);
                self.balance = 0;
                self.open = true;
            }
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrew { amount } => self.balance -= amount,
        }
    }
}

impl Account {
    /// Opens the account.
    pub fn open(&self, owner: &str) -> Result<Vec<AccountEvent>, AccountError> {
        if self.open {
            return Err(AccountError::AlreadyOpen);
        }
        Ok(vec![AccountEvent::Opened {
            owner: owner.to_owned(),
        }])
    }

    /// Deposits `amount`.
    pub fn deposit(&self, amount: i64) -> Result<Vec<AccountEvent>, AccountError> {
        if !self.open {
            return Err(AccountError::NotOpen);
        }
        if amount <= 0 {
            return Err(AccountError::InvalidAmount(amount));
        }
        Ok(vec![AccountEvent::Deposited { amount }])
    }

    /// Withdraws `amount`, refusing when the balance is too low.
    pub fn withdraw(&self, amount: i64) -> Result<Vec<AccountEvent>, AccountError> {
        if !self.open {
            return Err(AccountError::NotOpen);
        }
        if amount <= 0 {
            return Err(AccountError::InvalidAmount(amount));
        }
        if self.balance < amount {
            return Err(AccountError::InsufficientFunds {
                balance: self.balance,
                requested: amount,
            });
        }
        Ok(vec![AccountEvent::Withdrew { amount }])
    }
}
