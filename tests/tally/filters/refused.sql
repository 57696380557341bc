-- Each statement: a filter, then what the one-line refusal says.
nope = 1                                  -- unknown column 'nope'
payments.status = 'DONE'                  -- unknown column 'payments.status'
lower(status) = 'done'                    -- unsupported in a filter: 'LOWER(status)'
status LIKE 'DO%'                         -- unsupported in a filter
amount + 1 > 2                            -- unsupported in a filter: 'amount + 1'
amount                                    -- not a predicate
status = (SELECT 1)                       -- unsupported in a filter
amount >                                  -- not a SQL predicate
amount = 'many'                           -- cannot be evaluated on the declared column types
