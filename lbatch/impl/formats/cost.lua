--- What tokens cost: the one costing rule, used by `lbatch.estimate`
-- (before a batch) and `results:summary` (after it).
--
-- Prices are real-time prices in currency units per million tokens,
-- `{input = P, output = P}`; a batch costs a fraction of them (`discount`,
-- 0.5 at DashScope and OpenAI).
--
--    cost.of(1200, 300, { input = 0.8, output = 2 })   -- 0.00078
-- @module lbatch.impl.formats.cost
local M = {}

--- The discount of batch prices on real-time prices.
M.DISCOUNT = 0.5

--- The cost of input and output tokens at a price per million tokens,
-- times the discount: `(input * price.input + output * price.output) / 1e6 * discount`.
-- A price that is missing counts 0.
-- @tparam number input input (prompt) tokens
-- @tparam number output output (completion) tokens
-- @tparam table price `{input = P, output = P}`
-- @tparam[opt] number discount default `cost.DISCOUNT`
-- @treturn number
function M.of(input, output, price, discount)
  if discount == nil then discount = M.DISCOUNT end
  return (input * (price.input or 0) + output * (price.output or 0)) / 1e6 * discount
end

return M
