-- Each statement: a filter, then the rows of tests/tally/test_selection.py's ROWS it keeps
-- (by index). SQL's three-valued logic: a comparison with a null is unknown, not kept.
status = 'CANCELED'                                   -- 1
status <> 'DONE'                                      -- 1 3
status != 'DONE' OR status IS NULL                    -- 1 2 3
amount >= 100                                         -- 1 3
amount > 10 AND amount < 400                          -- 2 3
NOT amount > 10                                       -- 0
amount BETWEEN 5 AND 50                               -- 0 2
status IN ('DONE', 'PARTIAL_CANCELED')                -- 0 3
NOT status IN ('DONE')                                -- 1 3
card_last4 IS NULL                                    -- 1
card_last4 IS NOT NULL AND (amount = 5 OR amount = 50) -- 0 2
amount > -1 AND TRUE                                  -- 0 1 2 3
amount IN (-5, 500)                                   -- 1
